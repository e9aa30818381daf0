"""A study opened in the tools researchers use, each for real and offline: TensorBoard's own
event reader, MLflow's store, W&B's offline run files, optuna-dashboard's HTTP API and
Ray's results API; and what the console shows while it runs: a progress line, each
trial's output in its folder, a failed trial named with its traceback's file, no
start-up noise.

One small study serves the other study tests here and test_study.py's search test
(`shared_study`, tests/studies.py): 6 tiny trials of 3 losses, ASHA, label smoothing
searched for cross-entropy only (so other trials leave it out), `--logger mlflow --logger
wandb` with W&B offline, and one trial's worker killed mid-run with no retries left, so
that each tool also shows a failed trial. The confirmation's test reads test_confirm.py's
killed-and-resumed confirmation (`confirmed_study`), which logs to the same tools.
"""

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from study.config import flatten

from .conftest import (
    REPO,
    TINY_STUDY,
    free_port,
    python_json,
    read_trials,
    run_cli,
    study_args,
    wait_for,
)
from .studies import STUDY_NAME, Study

for package in ("tensorboard", "mlflow", "wandb", "optuna_dashboard"):
    pytest.importorskip(package, reason="the tools: pip install -e '.[viz,mlflow,wandb]'")

NAME = STUDY_NAME
# The lines the console must not show: TensorFlow's native start-up, Ray's and Optuna's
# informational lines, and the warnings that the study's own correct settings trigger.
NOISE = (
    "absl::InitializeLog",
    "oneDNN",
    "cuInit",
    "cudart_stub",
    "Token authentication is enabled",
    "Started a local Ray instance",
    "A new study created",
    "core_worker.cc",
    "mlflow.store.db",
    "Trial task failed",
    "Trials did not complete",
    "Traceback",
)


@pytest.fixture(scope="module")
def study(shared_study):
    return shared_study


@pytest.mark.study
def test_the_study_finishes_quietly_with_a_failed_trial_named(study):
    assert study.returncode == 0, study.stderr[-3000:]
    trials = study.trials()
    assert len(trials) == 6
    assert trials.loc[study.victim, "status"] == "error"
    assert set(trials.drop(study.victim).status) <= {"completed", "early_stopped"}
    console = study.stdout + study.stderr
    for noise in NOISE:
        assert noise not in console, noise
    # Each trial's output is in its folder; the failed one's traceback too, and the end
    # of the study names that file.
    for trial_id in trials.index:
        folder = study.folder / f"trial_{trial_id}"
        assert (folder / "stdout").is_file() and (folder / "stderr").is_file(), trial_id
    traceback = study.folder / f"trial_{study.victim}" / "error.txt"
    assert "The actor died unexpectedly" in traceback.read_text()  # Ray's words for a kill.
    assert f"trial {study.victim} failed: " in study.stdout
    end = study.stdout[study.stdout.rindex("Per loss.name, ranked") :]
    assert f"trial {study.victim} ended in an error: " in end and str(traceback) in end
    # How to open it in each tool.
    assert f"TensorBoard: tensorboard --logdir {study.folder}" in end
    assert f"MLflow: mlflow ui --backend-store-uri sqlite:///{study.folder}/mlflow.db" in end
    assert f"W&B: offline runs in {study.folder / 'wandb'}" in end


def _progress(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("progress: ")]


def _seconds(text: str) -> int:
    minutes, _, seconds = text.rstrip("s").rpartition("m")
    return int(minutes or 0) * 60 + int(seconds)


@pytest.mark.study
def test_the_progress_line_agrees_with_trials_csv(study):
    lines = _progress(study.stdout)
    assert len(lines) >= len(study.trials())  # At least one at each trial's end.
    elapsed = [_seconds(line.split("; ")[3].split()[0]) for line in lines]
    assert all(b - a <= 35 for a, b in zip(elapsed, elapsed[1:], strict=False)), elapsed
    # An upper bound once an epoch has ended (on a busy machine the first line may come
    # before one has).
    bounded = [line for line in lines if "time left unknown until an epoch ends" not in line]
    assert "at most" in bounded[0] and "(an upper bound: ASHA may stop trials early)" in bounded[0]
    trials = study.trials()
    best = trials.best_val_accuracy.idxmax()
    epochs = int(trials.epochs_run.sum())
    assert lines[-1].startswith(
        f"progress: 6/6 trials done, 0 running, 0 waiting; {epochs}/24 epochs; "
        f"best val_accuracy {trials.best_val_accuracy.max():.4f} "
        f"(trial {best}, {trials.loc[best, 'loss.name']}); "
    )


def _values(study: Study) -> tuple[pd.DataFrame, list[str]]:
    """trials.csv and its config columns (every config key, dotted)."""
    config = yaml.safe_load((study.folder / "config.yaml").read_text())
    config.pop("search")
    return study.trials(), list(flatten(config))


def _same(stored, expected) -> bool:
    """A tracker's value against trials.csv's (an empty cell: a key left out)."""
    if isinstance(expected, float) and np.isnan(expected):
        return stored in ("", None)
    if isinstance(expected, bool | np.bool_):
        return str(stored).lower() == str(bool(expected)).lower()
    if isinstance(expected, int | float | np.number) and not isinstance(stored, bool):
        return float(stored) == pytest.approx(float(expected))
    return str(stored) == str(expected)


@pytest.mark.study
def test_tensorboard_reads_each_trials_epochs_and_hyperparameters(study):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    trials, columns = _values(study)
    epochs = study.epochs()
    smoothed = 0
    for trial_id, trial in trials.iterrows():
        events = event_accumulator.EventAccumulator(str(study.folder / f"trial_{trial_id}"))
        events.Reload()
        rows = epochs[epochs.trial_id == trial_id]
        tags = set(events.Tags()["scalars"])
        assert {"loss", "accuracy", "val_loss", "learning_rate", "images_per_second"} <= tags
        scalars = events.Scalars("val_accuracy")
        assert [s.step for s in scalars] == rows.epoch.tolist(), trial_id
        assert [s.value for s in scalars] == pytest.approx(rows.val_accuracy.tolist())
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        ).session_start_info.hparams
        for column in columns:
            value = trial[column]
            if isinstance(value, float) and np.isnan(value):
                assert column not in start, (trial_id, column)  # Left out: no value.
                continue
            stored = start[column]
            kind = stored.WhichOneof("kind")
            assert _same(getattr(stored, kind), value), (trial_id, column)
        smoothed += "loss.label_smoothing" in start
        end = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_end_info"]
        ).session_end_info.status
        assert end == (2 if trial_id == study.victim else 1), trial_id  # FAILURE, SUCCESS
    assert smoothed == (trials["loss.name"] == "categorical_crossentropy").sum()


@pytest.mark.study
def test_mlflow_holds_each_trial_with_its_values_and_epochs(study):
    from mlflow import MlflowClient

    trials, columns = _values(study)
    epochs = study.epochs()
    client = MlflowClient(f"sqlite:///{study.folder}/mlflow.db")
    experiment = client.get_experiment_by_name(NAME)
    runs = {
        run.data.tags["ray_trial_id"]: run for run in client.search_runs([experiment.experiment_id])
    }
    assert set(runs) == set(trials.index)
    for trial_id, trial in trials.iterrows():
        run = runs[trial_id]
        assert sorted(run.data.params) == sorted(columns)  # Every key once, dotted.
        for column in columns:
            assert _same(run.data.params[column], trial[column]), (trial_id, column)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        rows = epochs[epochs.trial_id == trial_id]
        assert [m.step for m in history] == rows.epoch.tolist()
        assert [m.value for m in history] == pytest.approx(rows.val_accuracy.tolist())
        assert run.data.tags["status"] == trial.status
        assert run.info.status == ("FAILED" if trial.status == "error" else "FINISHED")


BLOCK = 32 * 1024  # W&B's transaction log: LevelDB's log format, after a 7-byte header.


def _wandb_records(path: Path):
    """The records of a W&B run file, parsed with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, chunks = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # A block's tail too short for a header.
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        chunks += data[position : position + length]
        position += length
        if kind in (1, 4):  # A whole record, or its last piece.
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _wandb_run(folder: Path) -> tuple[dict, list[dict]]:
    """A W&B offline run's config and history rows."""
    config, history = {}, []
    for record in _wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config |= _items(record.run.config.update)
        elif kind == "config":
            config |= _items(record.config.update)
        elif kind == "history":
            history.append(_items(record.history.item))
    return config, history


@pytest.mark.study
def test_wandb_offline_runs_hold_each_trial_with_its_values_and_epochs(study):
    trials, columns = _values(study)
    epochs = study.epochs()
    folders = {f.name.rsplit("-", 1)[1]: f for f in (study.folder / "wandb").glob("offline-run-*")}
    assert set(folders) == set(trials.index)
    for trial_id, trial in trials.iterrows():
        config, history = _wandb_run(folders[trial_id])
        for column in columns:  # Every key once, dotted, as it trained.
            assert _same(config[column], trial[column]), (trial_id, column)
        assert not [key for key in config if key.startswith(("loss/", "optimizer/"))]
        rows = epochs[epochs.trial_id == trial_id]
        assert [row["epoch"] for row in history] == rows.epoch.tolist()
        assert [row["val_accuracy"] for row in history] == pytest.approx(rows.val_accuracy.tolist())


@pytest.mark.study
def test_optuna_dashboard_serves_the_studies_and_their_trials(study, tmp_path):
    database = tmp_path / "optuna.db"  # A copy: the dashboard may add its own tables.
    shutil.copy(study.folder / "optuna.db", database)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), f"sqlite:///{database}",
         "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.load(response)

    def up():
        with contextlib.suppress(OSError):
            return bool(get("/api/meta"))
        return False

    try:
        wait_for(up, timeout=60, interval=0.5)
        listed = get("/api/studies")["study_summaries"]
        studies = {s["study_name"]: s["study_id"] for s in listed}
        trials = study.trials()
        losses = set(trials["loss.name"])
        assert set(studies) == {f"{NAME}/{loss}" for loss in losses}
        states = {"completed": "Complete", "early_stopped": "Pruned", "error": "Fail"}
        epochs = study.epochs()
        for loss in losses:
            served = get(f"/api/studies/{studies[f'{NAME}/{loss}']}")["trials"]
            by_id = {
                next(a["value"] for a in t["user_attrs"] if a["key"] == "ray_trial_id"): t
                for t in served
            }
            expected = trials[trials["loss.name"] == loss]
            assert set(by_id) == set(expected.index)
            for trial_id, trial in expected.iterrows():
                assert by_id[trial_id]["state"] == states[trial.status], trial_id
                rows = epochs[epochs.trial_id == trial_id]
                served_epochs = by_id[trial_id]["intermediate_values"]
                assert [v["step"] for v in served_epochs] == rows.epoch.tolist()
                assert [v["value"] for v in served_epochs] == pytest.approx(
                    rows.val_accuracy.tolist()
                )
                if trial.status == "completed":
                    assert by_id[trial_id]["values"] == [pytest.approx(trial.best_val_accuracy)]
    finally:
        os.killpg(dashboard.pid, signal.SIGKILL)
        dashboard.wait()


@pytest.mark.study
def test_rays_own_results_api_opens_the_study(study):
    from ray import tune

    from study.tuning import trial_function

    trials = study.trials()
    best = trials.best_val_accuracy.idxmax()
    grid = tune.Tuner.restore(str(study.folder), trainable=trial_function).get_results()
    result = grid.get_best_result("val_accuracy", "max", scope="all")
    assert Path(result.path).name == f"trial_{best}"
    assert result.config["loss.name"] == trials.loc[best, "loss.name"]
    checkpoint = result.get_best_checkpoint("val_accuracy", "max")
    with checkpoint.as_directory() as directory:
        assert (Path(directory) / "model.keras").is_file()
    frame = grid.get_dataframe().set_index("trial_id")
    assert set(frame.index) == set(trials.index)
    analysis = tune.ExperimentAnalysis(str(study.folder))
    assert analysis.get_best_trial("val_accuracy", "max", scope="all").trial_id == best
    frame = analysis.dataframe().set_index("trial_id")
    assert (frame["config/loss.name"] == trials.loc[frame.index, "loss.name"]).all()


def test_a_local_run_writes_tensorboard_mlflow_and_wandb_quietly(tmp_path, cifar10_tarball):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing import event_accumulator

    config = tmp_path / "local.yaml"
    config.write_text(
        yaml.safe_dump({**TINY_STUDY, "training": {**TINY_STUDY["training"], "epochs": 2}})
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = run_cli(
        "study.run", "--local", *study_args(config, cifar10_tarball, tmp_path, "local"),
        "--logger", "mlflow", "--logger", "wandb", env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in NOISE:
        assert noise not in result.stdout + result.stderr, noise
    folder = tmp_path / "local"
    epochs = pd.read_csv(folder / "epochs.csv")
    assert f"TensorBoard: tensorboard --logdir {folder}" in result.stdout
    events = event_accumulator.EventAccumulator(str(folder))
    events.Reload()
    assert [s.value for s in events.Scalars("val_accuracy")] == pytest.approx(
        epochs.val_accuracy.tolist()
    )
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert run.data.params["training.epochs"] == "2" and run.data.tags["status"] == "completed"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.value for m in history] == pytest.approx(epochs.val_accuracy.tolist())
    (offline,) = (folder / "wandb").glob("offline-run-*")
    wandb_config, history = _wandb_run(offline)
    assert wandb_config["loss.name"] == "categorical_crossentropy"
    assert [row["val_accuracy"] for row in history] == pytest.approx(epochs.val_accuracy.tolist())


@pytest.mark.study
def test_the_confirmation_reaches_the_same_tools(confirmed_study):
    """The confirmation (`confirmed_study`, tests/studies.py: killed once a run had
    finished, then resumed) logs each run to the same tools: MLflow once, however often it
    resumed; W&B in one offline segment per driver that ran it (the same run id, which
    `wandb sync` joins); TensorBoard its epochs and test accuracy. Its console: progress
    lines, no start-up noise."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing import event_accumulator

    done = confirmed_study
    resumed = done.resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for output in (done.killed, resumed.stdout + resumed.stderr):
        for noise in NOISE:
            assert noise not in output, noise
    folder = done.folder / "confirm"
    runs = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str, "config_id": str})
    runs = runs.set_index("trial_id")
    finished = set(done.before.trial_id[done.before.status == "completed"])
    lines = _progress(resumed.stdout)
    assert len(lines) >= len(set(runs.index) - finished)  # One at least as each ends.
    # An estimate once an epoch has ended (on a busy machine the first line may come before).
    estimates = ["left at this rate" in line for line in lines]
    assert any(estimates)
    first = estimates.index(True)
    assert all("time left unknown until an epoch ends" in line for line in lines[:first])
    assert not any("ASHA" in line for line in lines)  # Every run goes the full budget.
    assert lines[-1].startswith(f"progress: {len(runs)}/{len(runs)} trials done, 0 running")

    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    client = MlflowClient(f"sqlite:///{done.folder}/mlflow.db")
    experiment = client.get_experiment_by_name("seed-confirm").experiment_id
    logged = client.search_runs([experiment])
    assert sorted(run.data.tags["ray_trial_id"] for run in logged) == sorted(runs.index)
    logged = {run.data.tags["ray_trial_id"]: run for run in logged}  # One run each.
    segments: dict[str, list[Path]] = {}
    for path in sorted((done.folder / "wandb").glob("offline-run-*")):  # In time order.
        segments.setdefault(path.name.rsplit("-", 1)[1], []).append(path)
    assert set(segments) == set(runs.index)
    trials = read_trials(done.folder).set_index("trial_id")
    # The epochs reported after the kill: each must reach W&B (earlier ones may be lost
    # with the killed driver's W&B process).
    merged = epochs.merge(done.epochs_before, how="left", indicator=True)
    since = (merged["_merge"] == "left_only").to_numpy()
    for trial_id, run in runs.iterrows():
        # What it trained with: the study trial's values, with its own seed.
        trained = trials.loc[run.config_id]
        rows = epochs[epochs.trial_id == trial_id]
        mlflow_run = logged[trial_id]
        params = mlflow_run.data.params
        assert params["seed"] == str(run.seed) and params["config_id"] == run.config_id
        assert _same(params["optimizer.learning_rate"], trained["optimizer.learning_rate"])
        assert mlflow_run.info.status == "FINISHED"
        metric = client.get_metric_history(mlflow_run.info.run_id, "val_accuracy")
        steps = [m.step for m in metric]
        assert sorted(set(steps)) == sorted(set(rows.epoch)), trial_id
        history, configs = [], []
        for segment in segments[trial_id]:
            config, part = _wandb_run(segment)
            configs.append(config)
            history += [(row["epoch"], row["val_accuracy"]) for row in part]
        if trial_id not in finished:  # Its last segment: from the driver that ended well.
            assert configs[-1], trial_id
        for config in filter(None, configs):  # The killed driver's W&B may not have written.
            assert config["seed"] == run.seed and config["loss.name"] == trained["loss.name"]
        reported = list(zip(rows.epoch, rows.val_accuracy, strict=True))
        assert _in_order_within(history, reported), (trial_id, history, reported)
        after = rows[since[rows.index]]
        after = list(zip(after.epoch, after.val_accuracy, strict=True))
        assert _in_order_within(after, history), (trial_id, after, history)
        # TensorBoard's files are written in the trial's folder as each epoch ends: the
        # killed driver's too.
        events = event_accumulator.EventAccumulator(str(folder / f"trial_{trial_id}"))
        events.Reload()
        board = [(s.step, s.value) for s in events.Scalars("val_accuracy")]
        assert _in_order_within(board, reported) and _in_order_within(after, board), trial_id
        assert [s.step for s in events.Scalars("test_accuracy")] == [rows.epoch.max()]


def _in_order_within(part: list, whole: list) -> bool:
    """Whether `part`'s (epoch, value) pairs are in `whole`, in its order."""
    rest = iter(whole)
    return all(
        any(epoch == e and value == pytest.approx(v) for e, v in rest) for epoch, value in part
    )


def test_a_run_loads_only_the_trackers_it_logs_to(tmp_path):
    """Ray's telemetry imports every tracker integration it knows at each Tuner.fit (about
    1.5 s of CPU where MLflow and W&B are installed). A run that logs to neither loads
    neither; a later run in the same process that logs to both gets both, whole."""
    code = (
        "import json, sys\n"
        "from ray.air._internal.usage import _count_callbacks\n"
        "from study.callbacks import tracker_loggers\n"
        "from study.trackers import Trackers\n"
        "tracker_loggers(Trackers())\n"
        "_count_callbacks([])  # What Tuner.fit runs for Ray's telemetry.\n"
        "before = sorted({'mlflow', 'wandb'} & set(sys.modules))\n"
        f"both = Trackers(('mlflow', 'wandb'), mlflow_uri='sqlite:///{tmp_path}/m.db',\n"
        f"                wandb_mode='offline', wandb_dir='{tmp_path}')\n"
        "loggers = [type(logger).__mro__[1].__name__ for logger in tracker_loggers(both)]\n"
        "import ray.air.integrations.mlflow as m, ray.air.integrations.wandb as w\n"
        "print(json.dumps([before, loggers, m.mlflow is not None, w.wandb is not None]))\n"
    )
    before, loggers, mlflow_loaded, wandb_loaded = python_json(code)
    assert before == []
    assert loggers == ["MLflowLoggerCallback", "WandbLoggerCallback"]
    assert mlflow_loaded and wandb_loaded


def test_tensorboard_keeps_each_epoch_when_the_process_is_killed(tmp_path):
    """A driver killed (SIGKILL) after an epoch has that epoch in its events file: each is
    on disk once written, not held for a periodic flush."""
    from tensorboard.backend.event_processing import event_accumulator

    code = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from study.trackers import TensorBoardRun\n"
        "run = TensorBoardRun(Path(sys.argv[1]), {'loss.name': 'hinge', 'seed': 1})\n"
        "time.sleep(0.5)\n"  # A writer thread's first flush is at once; later ones are not.
        "run.epoch({'epoch': 1, 'val_accuracy': 0.25, 'loss': 2.0})\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, timeout=120)
    assert done.returncode == -signal.SIGKILL
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("val_accuracy")] == [(1, 0.25)]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_the_console_filter_drops_native_start_up_lines_only():
    """What TensorFlow's native code writes as it loads goes; every other line stays, in
    order, including the study's own warnings."""
    code = (
        "import os, sys\n"
        "from study.console import native_stderr_filtered\n"
        "with native_stderr_filtered():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called"
        " are written to STDERR\\n')\n"
        "    os.write(2, b'I0000 00:00:1.5   10906 port.cc:153] oneDNN custom operations\\n')\n"
        "    print('warning: checkpoint unreadable', file=sys.stderr)\n"
        "    os.write(2, b'E0000 00:00:1.7   10906 cuda_platform.cc:52] cuInit failed\\n')\n"
        "    os.write(2, b'E0000 00:00:1.8   10906 model.cc:1] a real error\\n')\n"
        "print('after', file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "warning: checkpoint unreadable",
        "E0000 00:00:1.8   10906 model.cc:1] a real error",
        "after",
    ]


def test_durations_read_and_print():
    from study.console import duration, parse_duration

    assert [parse_duration(t) for t in ("2h", "90m", "1h30m", "45s", "7200", "1.5h")] == [
        7200,
        5400,
        5400,
        45,
        7200,
        5400,
    ]
    for bad in ("", "soon", "2x", "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [duration(s) for s in (12, 250, 3700, 60)] == ["12s", "4m10s", "1h01m", "1m00s"]
