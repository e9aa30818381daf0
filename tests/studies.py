"""The two whole studies that several test modules read, each made once a session (and,
under pytest-xdist, on one worker: conftest's SHARED_FIXTURES): `shared_study`, which the
tools and search tests read, and `confirmed_study`, the confirmation killed and resumed,
which test_confirm.py and test_tools.py read. Registered in conftest's pytest_plugins."""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import (
    REPO,
    TINY_STUDY,
    isolated_ray,
    read_trials,
    run_cli,
    start_cli,
    study_args,
    wait_for,
)

STUDY_NAME = "tools"


@dataclass
class Study:
    folder: Path
    stdout: str
    stderr: str
    returncode: int
    victim: str  # The trial whose worker was killed.

    def trials(self) -> pd.DataFrame:
        return read_trials(self.folder).set_index("trial_id")

    def epochs(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "epochs.csv", dtype={"trial_id": str})


def _config(path: Path) -> Path:
    config = json.loads(json.dumps(TINY_STUDY))
    config["search"]["space"]["loss.label_smoothing"] = {
        "uniform": [0.0, 0.1],
        "when": {"loss.name": ["categorical_crossentropy"]},
    }
    config["search"]["max_failures"] = 0
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _kill_a_trial_mid_run(folder: Path) -> str:
    """SIGSTOPs a trial's worker that has reported epoch 3 of 4 (ASHA's rungs are at 1, 2
    and 4, so no decision on it is in flight), then SIGKILLs it; returns its id. A worker
    that had sent its epoch 4 before it stopped (trials.csv lags by that result) is let go
    on (SIGCONT), and another is found: that trial would die after its last epoch, which
    Tune tells the searcher with no result."""
    victims, passed = [], set()

    def freeze():
        trials = read_trials(folder)
        ready = trials[
            (trials.status == "running") & (trials.epochs_run == 3) & ~trials.trial_id.isin(passed)
        ]
        for trial in ready.itertuples():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(trial.pid), signal.SIGSTOP)
                time.sleep(2)  # For a result already sent to reach trials.csv.
                now = read_trials(folder).set_index("trial_id").epochs_run[trial.trial_id]
                if now == 3:
                    victims.append(trial)
                    return True
                passed.add(trial.trial_id)
                os.kill(int(trial.pid), signal.SIGCONT)
        return False

    wait_for(freeze, timeout=600, interval=0.05)
    os.kill(int(victims[0].pid), signal.SIGKILL)
    return victims[0].trial_id


@pytest.fixture(scope="session")
def shared_study(tmp_path_factory, cifar10_tarball) -> Study:
    """The one small study that the search and tools tests read (tests/test_tools.py says
    what it holds); it logs to MLflow and W&B where they are installed."""
    root = tmp_path_factory.mktemp("tools")
    config = _config(root / "tools.yaml")
    command = [
        sys.executable, "-m", "study.run", *study_args(config, cifar10_tarball, root, STUDY_NAME),
        *(f"--logger={name}" for name in ("mlflow", "wandb") if importlib.util.find_spec(name)),
    ]  # fmt: skip
    with isolated_ray() as env, open(root / "out", "w") as out, open(root / "err", "w") as err:
        env = {**env, "WANDB_MODE": "offline"}
        env.pop("MLFLOW_TRACKING_URI", None)
        driver = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=err, env=env, start_new_session=True
        )
        try:
            victim = _kill_a_trial_mid_run(root / STUDY_NAME)
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    return Study(
        root / STUDY_NAME,
        (root / "out").read_text(),
        (root / "err").read_text(),
        driver.returncode,
        victim,
    )


@dataclass
class Confirmed:
    """configs/seed.yaml's grid study, then its confirmation: killed, refused, resumed."""

    folder: Path
    study: subprocess.CompletedProcess  # The grid study.
    killed: str  # What the confirmation's first driver printed before its SIGKILL.
    before: pd.DataFrame  # confirm.csv at the kill.
    epochs_before: pd.DataFrame  # The confirmation's epochs.csv at the kill.
    again: subprocess.CompletedProcess  # --confirm again, without --resume.
    resumed: subprocess.CompletedProcess  # --confirm --resume.


def _finished_runs(folder: Path) -> int:
    return (read_trials(folder, "confirm.csv").status == "completed").sum()


@pytest.fixture(scope="session")
def confirmed_study(tmp_path_factory, cifar100_tarball) -> Confirmed:
    """configs/seed.yaml as a grid study over 2 of its losses (narrow, 2 epochs), then 2
    losses x 2 seeds of confirmation, its driver killed once a run has finished, then
    resumed. The confirmation logs to MLflow and W&B (offline) where they are installed:
    tests/test_confirm.py reads its results, tests/test_tools.py its trackers."""
    root = tmp_path_factory.mktemp("confirm")
    tiny = [
        "--set", "model.width=0.0625", "--set", "training.epochs=2",
        "--set", "training.batch_size=50", "--set", "training.eval_batch_size=200",
        "--set", "search.space.loss.name={choice: [categorical_crossentropy, hinge]}",
    ]  # fmt: skip
    common = ["--storage-path", root, "--name", "seed", "--no-dashboard"]
    loggers = [f"--logger={name}" for name in ("mlflow", "wandb") if importlib.util.find_spec(name)]
    confirm = ["--confirm", "--seeds", "2", *common, *loggers]
    folder = root / "seed"
    with isolated_ray() as env:
        env = {**env, "WANDB_MODE": "offline"}
        env.pop("MLFLOW_TRACKING_URI", None)
        study = run_cli(
            "study.run", "--config", REPO / "configs/seed.yaml", "--data-dir", cifar100_tarball,
            *tiny, *common, env=env,
        )  # fmt: skip
        assert study.returncode == 0, study.stderr[-3000:]
        with open(root / "killed.log", "w") as log:
            driver = start_cli("study.run", *confirm, env=env, output=log)
            try:
                wait_for(lambda: _finished_runs(folder) >= 1, timeout=600)
                driver.send_signal(signal.SIGKILL)
                driver.wait(timeout=60)
            finally:
                if driver.poll() is None:
                    os.killpg(driver.pid, signal.SIGKILL)
        # What the killed driver wrote (each table is replaced whole, so never half).
        before = pd.read_csv(folder / "confirm.csv", dtype={"trial_id": str})
        epochs = pd.read_csv(folder / "confirm" / "epochs.csv", dtype={"trial_id": str})
        again = run_cli("study.run", *confirm, env=env)
        resumed = run_cli("study.run", *confirm, "--resume", env=env)
    killed = (root / "killed.log").read_text()
    return Confirmed(folder, study, killed, before, epochs, again, resumed)
