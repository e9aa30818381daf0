"""A study on a Ray cluster whose results live in a bucket, and the resumes it needs, run
for real (scale: `pytest -m scale`): two nodes on this machine that share nothing but a
real S3-compatible server (tests/buckets.py), a worker node and then the driver lost,
resumed from a fresh folder with only the bucket, then confirmed and reported from it;
and, on local storage, a resume that would leave a ghost trial, and a worker that dies
while Tune saves its last epoch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat
import optuna
import pandas as pd
import pytest
import yaml

from study import storage
from study.files import STUDY_FILES

from .conftest import (
    RAY,
    REPO,
    TINY_STUDY,
    free_port,
    kill_marked,
    marked,
    read_trials,
    saved_state,
    wait_for,
    wait_for_nodes,
)

pytestmark = pytest.mark.scale

FAULTS_SITE = Path(__file__).parent / "faults_site"


def _config(path: Path, **search) -> Path:
    config = json.loads(json.dumps(TINY_STUDY))
    config["search"].update(search)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start_node(args, env, marker: str) -> None:
    env = {**env, "RAY_AUTH_MODE": "token", "STUDY_TEST_NODE": marker}
    done = subprocess.run(
        [RAY, "start", *args, "--disable-usage-stats"], capture_output=True, text=True,
        timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def nodes(tmp_path):
    """Starts Ray nodes on this machine, each with its own temp folder (RAY_TMPDIR) and a
    marker in its processes' environment; kills them all afterwards."""
    started = []

    def start(marker: str, *args, cpus=1, extra=None) -> dict:
        temp = tempfile.mkdtemp(prefix=f"ray{marker[:4]}", dir="/tmp")
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        env.update(extra or {}, RAY_TMPDIR=temp)
        started.append((marker, temp))
        head = ["--include-dashboard=false"] if "--head" in args else []
        _start_node([*args, f"--num-cpus={cpus}", *head], env, marker)
        return env

    yield start
    for marker, temp in started:
        kill_marked("STUDY_TEST_NODE", marker)
        shutil.rmtree(temp, ignore_errors=True)


def _driver(args, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """`python -m study.run ARGS` from `cwd`, in its own process group."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "study.run", *map(str, args)], cwd=cwd, stdout=out,
            stderr=subprocess.STDOUT, env={**env, "RAY_AUTH_MODE": "token"},
            start_new_session=True,
        )  # fmt: skip


def _finish(driver: subprocess.Popen, log: Path, timeout=900) -> str:
    try:
        driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log.read_text()
    assert driver.returncode == 0, text[-4000:]
    return text


def _each_epoch_once(trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """Every trial's epochs 1..epochs_run, each exactly once among the rows with rerun 0."""
    first = epochs[epochs.rerun == 0]
    for trial in trials.itertuples():
        got = sorted(first[first.trial_id == trial.trial_id].epoch)
        assert got == list(range(1, int(trial.epochs_run) + 1)), (trial.trial_id, got)


def test_a_study_in_a_bucket_survives_a_lost_node_and_a_lost_driver(
    tmp_path, s3_env, cifar10_tarball, nodes
):
    """Two nodes (a head and a worker, each its own temp folder), a study whose storage
    is the bucket: the worker node is killed under a trial, which goes on on the head from
    its checkpoint in the bucket; then the driver is killed and every local folder of the
    study deleted; `--resume` from a fresh folder with only the bucket finishes it, grown to
    7 trials on the way. Then `--confirm`, the report and the notebook, each from a fresh
    folder, from the URI."""
    port = free_port()
    head_env = nodes("head", "--head", f"--port={port}")
    address = f"127.0.0.1:{port}"
    nodes(
        "second", f"--address={address}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}", "--min-worker-port=21000",
        "--max-worker-port=21999",
    )  # fmt: skip
    wait_for_nodes(address, 2, head_env)
    env = s3_env.env(head_env)  # Only the driver has the bucket's settings and keys.
    uri = s3_env.uri("cluster")
    config = _config(tmp_path / "study.yaml")
    common = ["--storage-path", uri, "--name", "bucket", "--address", address, "--no-dashboard"]
    first = tmp_path / "first"
    first.mkdir()
    driver = _driver(
        ["--config", config, "--data-dir", cifar10_tarball, *common], first, env,
        tmp_path / "first.log",
    )  # fmt: skip
    tables = first / "results" / "bucket"
    victims = []

    def on_the_second_node() -> bool:
        """A trial running on the second node with at least one epoch checkpointed."""
        trials = read_trials(tables)
        there = set(marked("STUDY_TEST_NODE", "second"))
        running = trials[(trials.status == "running") & (trials.epochs_run >= 2)]
        victims.extend(row for row in running.itertuples() if int(row.pid) in there)
        return bool(victims)

    try:
        wait_for(on_the_second_node, timeout=600, interval=0.2)
        victim = victims[0]
        assert kill_marked("STUDY_TEST_NODE", "second") > 0
        # The driver is lost once the victim goes on on the head.
        wait_for(
            lambda: (
                read_trials(tables).set_index("trial_id").epochs_run[victim.trial_id]
                > victim.epochs_run
            ),
            timeout=600,
            interval=0.2,
        )
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    shutil.rmtree(first)  # The study's tables on the driver's machine.
    for staging in Path(head_env["RAY_TMPDIR"]).glob("**/artifacts/*/bucket"):
        shutil.rmtree(staging, ignore_errors=True)  # Ray's own copy of the experiment.

    second = tmp_path / "second"
    second.mkdir()
    # Resumed, and grown by a trial on the way: both from the bucket alone.
    resume = ["--resume", "--num-samples", "7", *common]
    out = _finish(_driver(resume, second, env, tmp_path / "second.log"), tmp_path / "second.log")
    assert "Per loss.name, ranked" in out and f"results: {uri}/bucket" in out
    folder = second / "results" / "bucket"
    trials = read_trials(folder)
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    studied = trials[trials.status != "orphaned"]
    assert len(studied) == 7 and not trials.status.isin(["running", "pending"]).any()
    assert yaml.safe_load((folder / "config.yaml").read_text())["search"]["num_samples"] == 7
    assert set(studied.status) <= {"completed", "early_stopped"}
    _each_epoch_once(trials, epochs)
    row = trials.set_index("trial_id").loc[victim.trial_id]
    assert row.restarts >= 1 and int(row.pid) != int(victim.pid)  # Went on on the head,
    assert (epochs[epochs.trial_id == victim.trial_id].epoch == 1).sum() == 1  # not anew.
    # The bucket holds the study's own files as the driver last wrote them.
    copy = tmp_path / "copy"
    storage.fetch(storage.join(uri, "bucket"), copy, STUDY_FILES)
    assert (copy / "trials.csv").read_text() == (folder / "trials.csv").read_text()
    assert (copy / "epochs.csv").read_text() == (folder / "epochs.csv").read_text()
    optuna_trials = [
        trial
        for name in optuna.study.get_all_study_names(f"sqlite:///{copy}/optuna.db")
        for trial in optuna.load_study(
            study_name=name, storage=f"sqlite:///{copy}/optuna.db"
        ).get_trials()
    ]
    ids = {t.user_attrs["ray_trial_id"] for t in optuna_trials if t.state.name != "FAIL"}
    assert ids == set(studied.trial_id)

    # The confirmation, from yet another folder, from the URI.
    third = tmp_path / "third"
    third.mkdir()
    confirm = ["--confirm", "--seeds", "2", *common]
    out = _finish(_driver(confirm, third, env, tmp_path / "third.log"), tmp_path / "third.log")
    assert "Test accuracy per loss.name" in out
    assert "confirm.csv" in storage.listing(storage.join(uri, "bucket"))
    # The report, from a folder that has never seen the study.
    fourth = tmp_path / "fourth"
    fourth.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "analysis.report", f"{uri}/bucket"], cwd=fourth, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = (fourth / "results" / "bucket" / "report.md").read_text()
    assert f"wrote {fourth / 'results' / 'bucket' / 'report.md'}" in done.stdout
    assert "## Confirmation over seeds (test set)" in report and "Welch" in report
    # The notebook of the best trials, given the bucket, from another fresh folder.
    fifth = tmp_path / "fifth"
    fifth.mkdir()
    notebook = nbformat.read(REPO / "analysis" / "best_trials.ipynb", as_version=4)
    notebook.cells[0].source = f"RESULTS_DIR = {uri + '/bucket'!r}\nDATA_DIR = None"
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": fifth}}
    ).execute()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert f"study: {uri}/bucket" in printed and "validation accuracy: " in printed
    assert (fifth / "results" / "bucket" / "figures" / "leaderboard.png").is_file()


def test_a_resume_leaves_no_ghost_trial(tmp_path, cifar10_tarball, nodes):
    """The driver dies after it recorded a trial and before Tune's state held it (Tune
    saves its state at its first step and then only now and then: here, not again).
    Resumed, Tune does not know that trial, and the searcher proposes its share again.
    The ghost is closed as orphaned, with its reason; it is never left running, and
    trials.csv, Optuna and the shares agree with the trials Tune ran."""
    port = free_port()
    env = nodes("ghost", "--head", f"--port={port}")  # One CPU: one trial at a time.
    address = f"127.0.0.1:{port}"
    # Tune saves its state at its first step, then every TUNE_GLOBAL_CHECKPOINT_S, and
    # whenever a trial has made keep_checkpoints checkpoints: here, never again.
    config = _config(tmp_path / "study.yaml", num_samples=3, max_failures=0, keep_checkpoints=99)
    common = ["--storage-path", tmp_path, "--name", "ghost", "--address", address]
    quiet = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    driver = _driver(
        ["--config", config, "--data-dir", cifar10_tarball, *common], tmp_path, quiet,
        tmp_path / "first.log",
    )  # fmt: skip
    folder = tmp_path / "ghost"
    ghosts = []

    def a_trial_tune_has_not_saved() -> bool:
        trials = read_trials(folder)
        known = saved_state(folder)
        if not known:
            return False
        fresh = trials[(trials.epochs_run >= 1) & ~trials.trial_id.isin(list(known))]
        ghosts.extend(fresh.trial_id)
        return bool(ghosts)

    try:
        wait_for(a_trial_tune_has_not_saved, timeout=600, interval=0.05)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    ghost = ghosts[0]
    assert read_trials(folder).set_index("trial_id").status[ghost] == "running"
    _finish(_driver(["--resume", *common], tmp_path, env, tmp_path / "second.log"),
            tmp_path / "second.log")  # fmt: skip
    trials = read_trials(folder).set_index("trial_id")
    assert not trials.status.isin(["running", "pending", "restarting"]).any()
    assert trials.status[ghost] == "orphaned"
    assert "driver died before Tune saved this trial" in trials.message[ghost]
    tune_ids = set(saved_state(folder))
    studied = trials[trials.status != "orphaned"]
    # A trial that had finished (Optuna knew) though Tune's state did not: it ends again,
    # and telling Optuna twice is no error.
    assert set(studied.status) <= {"completed", "early_stopped"}, studied.status
    assert set(studied.index) == tune_ids and ghost not in tune_ids
    # Each loss's share, as the study promised it: 1 each of 3.
    assert studied["loss.name"].value_counts().to_dict() == {
        "categorical_crossentropy": 1, "hinge": 1, "mean_squared_logarithmic_error": 1
    }  # fmt: skip
    storage_url = f"sqlite:///{folder}/optuna.db"
    recorded = {}
    for name in optuna.study.get_all_study_names(storage_url):
        for trial in optuna.load_study(study_name=name, storage=storage_url).get_trials():
            recorded[trial.user_attrs["ray_trial_id"]] = trial
    assert recorded[ghost].state.name == "FAIL"
    assert recorded[ghost].user_attrs["status"] == "orphaned"
    assert {tid for tid, t in recorded.items() if t.state.name != "FAIL"} == tune_ids
    assert all(t.state.name != "RUNNING" for t in recorded.values())
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    _each_epoch_once(trials.reset_index(), epochs)


def test_the_last_epoch_of_a_trial_whose_worker_dies_saving_it_reaches_optuna(
    tmp_path, cifar10_tarball, nodes
):
    """Tune gives a searcher no result for the epoch at which ASHA stops a trial (its last,
    at the full budget), only the trial's end; a worker that dies while Tune saves that
    epoch's checkpoint ends the trial in an error, with no result. Its last epoch is in the
    study's epochs.csv, and must be in Optuna too."""
    port = free_port()
    marker = tmp_path / "died"
    faults = {
        "PYTHONPATH": os.pathsep.join([str(FAULTS_SITE), str(REPO)]),
        "STUDY_TEST_DIE_SAVING_EPOCH": "4",
        "STUDY_TEST_DIE_MARKER": str(marker),
    }
    # The node's raylet starts the workers, which take the fault from its environment.
    env = nodes("saving", "--head", f"--port={port}", extra=faults)
    config = _config(tmp_path / "study.yaml", num_samples=3, max_failures=0)
    args = ["--config", config, "--data-dir", cifar10_tarball, "--storage-path", tmp_path,
            "--name", "saving", "--address", f"127.0.0.1:{port}"]  # fmt: skip
    _finish(_driver(args, tmp_path, env, tmp_path / "run.log"), tmp_path / "run.log")
    assert marker.is_file()  # A worker died saving epoch 4.
    folder = tmp_path / "saving"
    trials = read_trials(folder)
    [dead] = trials[trials.status == "error"].itertuples()
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    mine = epochs[epochs.trial_id == dead.trial_id].set_index("epoch")
    assert list(mine.index) == [1, 2, 3, 4]
    storage_url = f"sqlite:///{folder}/optuna.db"
    stored = {
        t.user_attrs["ray_trial_id"]: t
        for name in optuna.study.get_all_study_names(storage_url)
        for t in optuna.load_study(study_name=name, storage=storage_url).get_trials()
    }
    failed = stored[dead.trial_id]
    assert failed.state.name == "FAIL"
    assert failed.intermediate_values == pytest.approx(mine.val_accuracy.to_dict())
