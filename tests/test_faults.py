"""The fault suite: faults injected for real (real processes, real Ray) on CPU.

A trial's worker is SIGKILLed mid-epoch; another's checkpoints are corrupted before it
is killed; a trial diverges; a worker node of a two-node cluster dies; the driver's
results files are written while it is killed; the dashboard is asked without a token.
(The driver's Ctrl-C and SIGKILL with `--resume` are in test_study.py.)
"""

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from .conftest import (
    REPO,
    TINY_STUDY,
    kill_marked,
    marked,
    read_trials,
    saved_state,
    study_args,
    wait_for,
)

pytestmark = pytest.mark.study

# A fixed-budget study (FIFO) long enough to kill trials mid-run. The baseline, SGD at a
# learning rate of 10 on a squared error, diverges in its first epoch; Adam trials learn.
FAULT_STUDY = {
    **TINY_STUDY,
    "loss": {"name": "mean_squared_error"},
    "optimizer": {"name": "sgd", "schedule": "constant"},
    "training": {**TINY_STUDY["training"], "epochs": 6, "checkpoint_every": 1},
    "search": {
        "num_samples": 5,
        "scheduler": "fifo",
        "seed": 0,
        "space": {
            "optimizer.name": {"choice": ["sgd", "adam"]},
            "optimizer.learning_rate": {
                "loguniform": [1e-3, 3e-3],
                "by": "optimizer.name",
                "ranges": {"sgd": [5.0, 10.0]},
            },
        },
        "baseline": {"optimizer.name": "sgd", "optimizer.learning_rate": 10.0},
    },
}


def _study(config: dict, folder: Path, data: Path, name: str, *args, env):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "study.run", *study_args(path, data, folder, name), *args]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )


def _running(folder: Path, exclude=(), min_epochs=2) -> pd.Series | None:
    trials = read_trials(folder)
    if "pid" not in trials:
        return None
    ready = trials[
        (trials.status == "running")
        & (trials.epochs_run >= min_epochs)
        & (trials.epochs_run < 5)
        & ~trials.trial_id.isin(exclude)
    ]
    return ready.iloc[0] if len(ready) else None


def _freeze(folder: Path, exclude=()) -> pd.Series:
    """Finds a trial mid-run and stops (SIGSTOP) its worker process, so that the fault
    lands mid-epoch, whatever the machine's speed; returns the trial's row.

    Tune takes a reported epoch's checkpoint in a second call to the worker: a worker
    stopped between the two has its epoch in trials.csv but Tune restores it from the
    checkpoint before. So the worker stays stopped only once Tune's saved state has the
    checkpoint of the epoch that trials.csv shows; otherwise it goes on (SIGCONT), and
    another try follows."""
    found = []

    def freeze():
        trial = _running(folder, exclude)
        if trial is None:
            return False
        try:
            os.kill(int(trial.pid), signal.SIGSTOP)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + 30  # Tune saves its state every 10 s or more.
        while time.monotonic() < deadline:
            trials = read_trials(folder)
            row = trials[trials.trial_id == trial.trial_id].iloc[0]
            if saved_state(folder).get(row.trial_id, (None,) * 4)[3] == row.epochs_run:
                found.append(row)
                return True
            time.sleep(0.5)
        os.kill(int(trial.pid), signal.SIGCONT)
        return False

    wait_for(freeze, timeout=300, interval=0.1)
    return found[0]


def test_killed_workers_and_a_corrupt_checkpoint_and_divergence(tmp_path, cifar10_tarball, ray_env):
    driver = _study(FAULT_STUDY, tmp_path, cifar10_tarball, "faults", "--no-dashboard", env=ray_env)
    folder = tmp_path / "faults"
    try:
        # 1. A worker SIGKILLed mid-epoch: the trial goes on from its last checkpoint.
        killed = _freeze(folder)
        os.kill(int(killed.pid), signal.SIGKILL)
        # 5. Another's checkpoints corrupted (one truncated, the rest deleted), then killed.
        corrupt = _freeze(folder, exclude=[killed.trial_id])
        checkpoints = sorted((folder / f"trial_{corrupt.trial_id}").glob("checkpoint_*"))
        assert checkpoints, "no checkpoint to corrupt"
        for checkpoint in checkpoints:
            model = checkpoint / "model.keras"
            model.write_bytes(model.read_bytes()[:512])
            (checkpoint / "state.json").unlink()
        os.kill(int(corrupt.pid), signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, stderr[-3000:]

    trials = read_trials(folder).set_index("trial_id")
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    # Every trial is accounted for, and every one that did not diverge ran to the end.
    assert len(trials) == 5 and set(trials.status) <= {"completed", "diverged"}
    for trial_id in trials.index[trials.status == "completed"]:
        rows = epochs[epochs.trial_id == trial_id]
        assert sorted(rows[rows.rerun == 0].epoch) == list(range(1, 7)), trial_id

    rows = epochs[epochs.trial_id == killed.trial_id]
    assert trials.loc[killed.trial_id, "restarts"] == 1
    assert trials.loc[killed.trial_id, "status"] == "completed"
    # Restored from its last checkpoint (one every epoch): at most the epoch it was killed
    # in ran again, and never epoch 1.
    assert set(rows[rows.rerun == 1].epoch) <= {killed.epochs_run + 1}

    rows = epochs[epochs.trial_id == corrupt.trial_id]
    assert trials.loc[corrupt.trial_id, "restarts"] == 1
    assert trials.loc[corrupt.trial_id, "status"] == "completed"
    assert "restarted from scratch" in trials.loc[corrupt.trial_id, "warning"]
    # The warning is where a user looks: the trial's own stderr, in its folder.
    stderr_file = (folder / f"trial_{corrupt.trial_id}" / "stderr").read_text()
    assert "unreadable" in stderr_file and "restarted from scratch" in stderr_file
    assert (rows.epoch == 1).sum() == 2 and rows[rows.epoch == 1].rerun.tolist() == [0, 1]

    # 4. The baseline diverged: marked in trials.csv, told to Optuna as a failure.
    first = trials.sort_values("started_at").iloc[0]
    assert first.status == "diverged" and first.message.startswith("non-finite loss")
    stored = optuna.load_study(study_name="faults", storage=f"sqlite:///{folder}/optuna.db")
    states = {t.params["optimizer.learning_rate"]: t.state for t in stored.trials}
    assert states[10.0] == optuna.trial.TrialState.FAIL
    assert len(stored.trials) == 5


def test_a_dead_worker_node_moves_its_trials_to_the_survivor(
    tmp_path, cifar10_tarball, two_nodes, ray_env
):
    address = two_nodes
    config = {
        **TINY_STUDY,
        "training": {**TINY_STUDY["training"], "epochs": 7, "checkpoint_every": 1},
        # One trial on each node at a time; the second node dies under one of them.
        "search": {**TINY_STUDY["search"], "num_samples": 2, "scheduler": "fifo", "stratify": None},
    }
    driver = _study(config, tmp_path, cifar10_tarball, "node", "--address", address, env=ray_env)
    folder = tmp_path / "node"
    marker = b"STUDY_TEST_NODE=second\0"

    victims = []

    def on_second_node():
        """A trial mid-run on the second node, its worker stopped (SIGSTOP) so that it is
        still the one there, mid-epoch, when the node dies."""
        trial = _running(folder)
        if trial is None:
            return False
        try:
            if marker not in Path(f"/proc/{int(trial.pid)}/environ").read_bytes():
                return False
            os.kill(int(trial.pid), signal.SIGSTOP)
        except OSError:
            return False
        victims.append(trial)
        return True

    try:
        wait_for(on_second_node, timeout=300, interval=0.2)
        victim = victims[0]
        assert kill_marked("STUDY_TEST_NODE", "second") > 0  # The node's raylet and workers.
        stdout, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, stderr[-3000:]
    trials = read_trials(folder).set_index("trial_id")
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(trials) == 2 and set(trials.status) == {"completed"}
    row = trials.loc[victim.trial_id]
    assert row.restarts >= 1 and row.node_id != victim.node_id  # Finished on the survivor.
    rows = epochs[epochs.trial_id == victim.trial_id]
    assert sorted(set(rows.epoch)) == list(range(1, 8))
    assert (rows.epoch == 1).sum() == 1  # From its checkpoint, not from scratch.


def test_results_files_survive_a_kill_mid_write(tmp_path):
    """A process rewriting a large trials.csv in a loop, SIGKILLed at random moments:
    the file is always a whole table, old or new, never half of one."""
    path = tmp_path / "trials.csv"
    writer = (
        "import sys; from study import files\n"
        "rows = [{'trial_id': f't{i}', 'value': 'x' * 200} for i in range(5000)]\n"
        "for n in range(10**9):\n"
        "    files.write_csv(sys.argv[1], [dict(r, n=n) for r in rows])\n"
    )

    def writing() -> bool:
        """A whole table is there, and the next one is being written beside it."""
        return path.exists() and any(tmp_path.glob(".trials.csv.*"))

    for _ in range(5):
        process = subprocess.Popen([sys.executable, "-c", writer, str(path)], cwd=REPO)
        try:
            wait_for(writing, timeout=60, interval=0.001)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        table = pd.read_csv(path)
        assert len(table) == 5000 and table.n.nunique() == 1
        assert table.value.str.len().eq(200).all()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "trials.csv"]
    # A kill between write and rename may leave a hidden temporary file; never a table.
    assert all(name.startswith(".trials.csv.") for name in leftovers)


def test_exposed_dashboard_warns_and_refuses_requests_without_the_token(ray_env):
    """The study's own `connect`, with the dashboard on every interface: a warning, and the
    job API (which runs code on the cluster) answers only with the token. The default,
    127.0.0.1, is checked by the study tests. Its Ray starts no worker ahead of the trials:
    Ray would start one per core, which no trial used, each idle for the whole study."""
    code = (
        "import sys, time\n"
        "from study.tuning import StudyOptions, connect\n"
        "connect(StudyOptions(name='dashboard', dashboard_host='0.0.0.0'))\n"
        "sys.stdout.flush(); sys.stderr.flush(); time.sleep(600)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ray_env,
        start_new_session=True,
    )
    try:
        lines = []
        while not any(line.startswith("warning: the dashboard") for line in lines):
            line = process.stdout.readline()
            assert line, "".join(lines)[-3000:]
            lines.append(line)
        url = next(line for line in lines if line.startswith("Ray dashboard: ")).split()[2]
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()

        def get(path, headers=None):
            request = urllib.request.Request(url + path, headers=headers or {})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        wait_for(lambda: get("/api/jobs/") in (401, 403), timeout=60)
        assert get("/api/jobs/", {"Authorization": "Bearer not-the-token"}) == 403
        assert get("/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
        time.sleep(2)  # Ray's prestarted workers are up within a second or two of a driver.
        commands = marked("RAY_TMPDIR", ray_env["RAY_TMPDIR"]).values()
        assert any("raylet" in command for command in commands), commands
        assert not [command for command in commands if command.startswith("ray::IDLE")]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
